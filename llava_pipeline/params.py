"""`python -m llava_pipeline.params ...` is `python -m llava_pipeline.base.params ...` (conf/ -> params.yaml; same
arguments, output and exit status): the short spelling the README gives. No module imports this one."""

import runpy

if __name__ == "__main__":
    runpy.run_module("llava_pipeline.base.params", run_name="__main__", alter_sys=True)
