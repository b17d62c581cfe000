"""The shipped Hydra configs (``pkg://diffopsearch.conf``). Importing this package registers the
structured-config schemas, so composing these files always type-checks them."""
from .. import config as _config  # noqa: F401  (registers the <app>_schema nodes)
