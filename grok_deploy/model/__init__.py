"""The model room: Grok-1's config and presets, the official tensor names, the reference model in
PyTorch, generation and sampling, the tokenizer, and the decoder-engine protocol every engine
implements. No file I/O beyond the tokenizer model, no parallelism; imports only the ground floor.
"""
