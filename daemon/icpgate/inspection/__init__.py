"""Site inspection (docs/inspection.md): do the sites filed with our access still resolve here?

For each filing whose access record names our `provider.id`, its domains are resolved through the
configured resolvers (DNS queries only, never a probe to an address), classified, and kept with
their history, so that a report can list the hollow filings (空壳) to review for 取消接入, and the
hosts the gate blocked as `filed_elsewhere` that need a new access filing (新增接入) here.
"""
