"""cmc-edge: Cross-model Control (Wu et al., NeurIPS 2024) for local, offline, quantized LLMs.

A tiny delta language model is trained once beside a frozen template LLM; at decode time its
logit shift, mapped through a PM-MinED token map, steers any GGUF model run by llama.cpp.

Stages (one subpackage each): ``train`` -> ``export`` -> ``tokenmap`` -> ``runtime``; ``eval``
measures the effect. Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
