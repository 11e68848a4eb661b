"""The current release of tinker-cookbook, run unmodified in a child process beside the SDK.

The cookbook and the packages it imports that the dev environment lacks are installed once,
pinned and with `--no-deps`, into one directory of the SDK cache (tinker_sdk.pinned_directory).
Its other requirements (torch, transformers, numpy, pydantic, rich, tqdm, anyio, safetensors,
pillow, huggingface-hub, and python-dateutil for pandas) are already there; tml-renderers is
imported only for the Inkling models, so it is left out. A child runs one scenario of
tests/server/cookbook_side.py with the cookbook, SDK 0.38 and this repository (for `import bios`)
on its path. (This module is not named `tinker_cookbook`: tests/support is on the path, and it
would shadow the package.)
"""

from __future__ import annotations

from pathlib import Path

from tinker_sdk import REPO, pinned_directory, sdk_directory, sdk_result, start_child

COOKBOOK = "tinker-cookbook==0.6.1"
COOKBOOK_SDK = "0.38.0"
"""The SDK release the cookbook runs with: the oldest it accepts (tinker>=0.38)."""
COOKBOOK_IMPORTS = (
    "chz==0.4.0",
    "termcolor==3.3.0",
    # tinker_cookbook.supervised imports its Hugging Face dataset builders, and with them:
    "blobfile==3.3.0",
    "lxml==6.2.0",
    "datasets==5.2.0",
    "pyarrow==26.0.1",
    "pandas==3.1.1",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "xxhash==4.1.0",
)
COOKBOOK_SIDE = REPO / "tests" / "server" / "cookbook_side.py"


def cookbook_directory() -> Path:
    """A directory holding the cookbook and the packages it imports, installed on first use."""
    return pinned_directory(f"cookbook-{COOKBOOK.split('==')[1]}", COOKBOOK, *COOKBOOK_IMPORTS)


def run_cookbook(scenario: str, **arguments: object) -> dict:
    """Run `scenario` (a function of cookbook_side.py) in a child process: what it saw."""
    path = [cookbook_directory(), sdk_directory(COOKBOOK_SDK), REPO]
    return sdk_result(start_child(COOKBOOK_SIDE, path, scenario, **arguments), timeout=300)
