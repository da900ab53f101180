"""The edge runtime: bundle loading, the ONNX delta session, re-sync and the llama.cpp decode loop (no torch)."""
