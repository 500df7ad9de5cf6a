"""The serving room: config.pbtxt templates and python-backend models (package data), package
(triton_repo/), deploy (the Triton server) and the gRPC client. Imports onnx (the engine the
python backend runs), model, checkpoint and the ground floor; never the pipeline.
"""
