"""Training stage (PyTorch): a tiny delta LM learns beside a frozen template LLM."""
