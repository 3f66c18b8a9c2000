"""Request handlers of the relay, one module per concern, wired into ``server/connection.py``'s
``_HANDLERS`` table (docs/contracts.md section 6)."""
