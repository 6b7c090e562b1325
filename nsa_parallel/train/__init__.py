"""``nsa-train``: trains a Megatron-core GPT model with NSA attention from a job config.

The command (``cli``) validates the config and the resources, then hands over to the
Ray launcher (``nsa_launch``) or, with ``--no-ray``, runs one process (or one per
``torchrun`` rank) itself. Every worker runs :func:`nsa_parallel.train.trainer.train`.
Importing this package is cheap: Megatron, Ray and TensorBoard load only when used.
"""
