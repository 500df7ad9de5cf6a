"""Python-backend Triton models, copied by package.py into triton_repo/<model>/1/model.py."""
