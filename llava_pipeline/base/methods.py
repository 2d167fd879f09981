"""The methods of the .pte that ExecuTorch's MultimodalRunner calls (behind llava_main and the
demo apps): the three programs, each exported and lowered on its own, and the constant method
it cannot run without."""

METHODS = ("vision_encoder", "token_embedding", "text_decoder")
MAX_SEQ_LEN = "get_max_seq_len"
REQUIRED = (*METHODS, MAX_SEQ_LEN)
