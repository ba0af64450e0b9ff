"""The module the ``template`` entry point names: it registers what the plugin provides.

Keep this module cheap to import: every ``Registry()`` (and so every ``mhee plugins``) imports it.
For a heavy dependency, import it inside your factory instead of at the top of the file.
"""

from __future__ import annotations

# Rename: your package and class.
from mhee_plugin_template.policy import ConsecutiveConfident
from mhee_sdk import hookimpl
from mhee_sdk.hookspecs import Register


# The function name must be one of the hooks in mhee_sdk.hookspecs (here: exit policies). A plugin can
# implement several hooks: add `register_retrievers(register)`, `register_exit_heads(register)` ... beside it.
@hookimpl
def register_exit_policies(register: Register) -> None:
    # register(name, factory, description): the factory is called with the run config's policy_params
    # as keyword arguments. Names are lowercase, unique across all plugins (a clash names both plugins).
    register("consecutive-confident", ConsecutiveConfident, "Exit when the last N heads were all >= T confident")
