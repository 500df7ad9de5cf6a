"""The ONNX room: the decoder graph with a KV cache, export-onnx (weights streamed into external
data) and the ONNX Runtime engine. Imports model, checkpoint and the ground floor; a peer of trtllm.
"""

# MatMulNBits block along K (a power of 2 >= 16). ONNX Runtime 1.32's int8-activation kernels on
# AVX-512 VNNI, one expert matrix (K 1024, N 10928) x 24 copies, 2 threads, interleaved rounds
# (bench/onnx_decode.py's host): median per call at M = 1 / 8 / 32 rows, block 64: 448 / 727 /
# 2360 us, block 128: 322 / 633 / 1975 us (block 32: 347 us, 256: 389 us at M = 1). Exports before
# this one used 64.
BLOCK_SIZE = 128
