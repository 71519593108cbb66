"""Events out: signed webhook deliveries from the outbox (store/outbox.py)."""
