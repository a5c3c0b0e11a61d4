"""Model runners: one interface (`ModelRunner`) over each backend that runs a causal LM.

- `hf.HFRunner`: PyTorch, any `transformers` checkpoint, CPU or GPU.
- `llama_cpp.LlamaCppRunner`: llama.cpp on a native GGUF file (quantized weights as stored).
"""
