"""``nsa-eval``: scores trained runs on held-out loss, passkey retrieval and MQAR (see ``cli``).

Importing this package is cheap: Megatron loads only when a run is evaluated.
"""
