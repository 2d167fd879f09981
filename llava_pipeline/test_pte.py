"""`python -m llava_pipeline.test_pte ...` is `python -m llava_pipeline.verify ...` (same arguments,
output and exit status): the spelling the project's original brief gives for the verifier, kept
for those who type it. No module imports this one; the verifier is llava_pipeline/verify/."""

import runpy

if __name__ == "__main__":
    runpy.run_module("llava_pipeline.verify", run_name="__main__", alter_sys=True)
