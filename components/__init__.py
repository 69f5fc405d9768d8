"""The pipeline's stages and their helpers (docs/architecture.md).

Importing any module of this package first runs this file, which switches the libraries' telemetry and
update checks off (components.core.runtime), so no module has to order its imports around that.
"""

from components.core.runtime import quiet_environment

quiet_environment()
