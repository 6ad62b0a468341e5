"""The heads, one module each; importing a module registers its head (``heads.registry``).

A new head is a new module here that decorates its class with ``@register_head("name")``, plus its
import line below.
"""
from heads.models import aladin, caa, hrem, laps, linear, scan, tgdt, vse  # noqa: F401
