"""ExecuTorch's MultimodalRunner (runner), a conversation over it (chat), scoring a .pte against the
reference (evaluate), and a stand-in for llava_main's image loading and prompt."""
