"""What the operator reads from the violation log: each record's filing status now, DNS confirmation of
violations, and the table, CSV and ISMS exports.

Control plane, above the gate. May import violations, policy, registry and the leaves.
"""
