import os

from hypothesis import settings

# CI runs the same examples every time (a failure there is reproducible, never a fluke of the
# draw); local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
