"""Question/passage encoders, chunking, the FAISS passage index and its docstore."""
