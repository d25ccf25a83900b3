"""nla: Natural Language Autoencoders on one GPU.

Data flows one way: corpus -> activations -> warm-start data -> SFT -> RL -> checkpoint -> explain.
Layer convention, used everywhere: layer L is the residual stream after decoder block L
(0-indexed), i.e. Hugging Face `hidden_states[L + 1]`.
"""
__version__ = "0.1.0"
LAYER_CONVENTION = "residual stream after decoder block L (0-indexed) = HF hidden_states[L+1]"
