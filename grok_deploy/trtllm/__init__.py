"""The TensorRT-LLM room: its tensor names as data, pure sharding functions, convert (rank layout
and worker processes), the streaming safetensors writer, check-shards (rank files under
torch.distributed) and the engine build. Imports model, checkpoint and the ground floor.
"""
