"""HTTP for people and programs: the management API, the dashboard and its sessions,
health, metrics."""
