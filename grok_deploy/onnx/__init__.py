"""The ONNX room: the decoder graph with a KV cache, export-onnx (weights streamed into external
data) and the ONNX Runtime engine. Imports model, checkpoint and the ground floor; a peer of trtllm.
"""
