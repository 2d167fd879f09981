"""`python -m llava_pipeline.evaluate ...` is `python -m llava_pipeline.runtime.evaluate ...` (the evaluate summary line; same
arguments, output and exit status): the short spelling the README gives. No module imports this one."""

import runpy

if __name__ == "__main__":
    runpy.run_module("llava_pipeline.runtime.evaluate", run_name="__main__", alter_sys=True)
