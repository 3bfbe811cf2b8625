"""Engine connectors (vLLM, SGLang, TensorRT-LLM, transformers); each module imports its engine lazily."""
