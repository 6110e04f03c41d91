"""Generation engines: `synthetic` (deterministic, for load tests) and `llama` (llama.cpp)."""
