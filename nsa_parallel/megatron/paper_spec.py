"""A ready-made layer spec for Megatron-LM's ``--spec``: NSA with the paper's settings.

``pretrain_gpt.py --spec nsa_parallel.megatron.paper_spec layer_spec`` takes the module attribute
as it is (Megatron does not call it), so the spec is built at import: ``NSAConfig()`` defaults
(l=32, d=16, l'=64, n=16, w=512), Triton on GPUs, the local (apex/torch) Megatron modules.
For other settings, write the same two lines with your own ``NSAConfig``.
"""
from ..config import NSAConfig
from .specs import get_gpt_layer_nsa_spec

layer_spec = get_gpt_layer_nsa_spec(NSAConfig())
