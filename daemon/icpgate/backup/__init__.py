"""Backup and restore of an edge's state: the registry, the violation log and the site-inspection
history (docs/deployment.md, "Backup and restore")."""
