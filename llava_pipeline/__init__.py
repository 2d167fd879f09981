"""LLaVA-1.5 checkpoint -> ExecuTorch program, as layers, bottom first; a module imports only its
own layer and those below it (tests/test_layers.py):

    base/      errors, JSON and hashes, RSS, the machine, the .pte's method names, the config
    formats/   the artifacts' and the task's formats (tokenizer.bin, images, .pte metadata, scenes)
    model/     the model definition, its hyperparameters, checkpoints and HF conversion
    export/    quantization, lowering to XNNPACK, the stage-boundary model files
    pipeline/  stage plumbing, checkpoint sources, eval sets, the transformers reference
    runtime/   ExecuTorch's MultimodalRunner and what runs on it (chat, scoring)
    verify/    the .pte verifier

The modules at this level are the command-line entry points, imported by no module:
run (the llava_main-style CLI), sweep, and the short spellings `python -m llava_pipeline.evaluate`,
`.params` and `.test_pte` of runtime/evaluate, base/params and verify/.
"""
