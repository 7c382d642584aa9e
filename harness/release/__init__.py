"""The release loop (`forgebench release`): a spec's pick gated against the champion, then
shipped to Ollama under a stable name (`ship`) and promoted, in the order that makes a kill
harmless (`loop`)."""

from harness.release.loop import Outcome, release, shipped_adapter
from harness.release.ship import NotShipped, Shipped, ship

__all__ = ["NotShipped", "Outcome", "Shipped", "release", "ship", "shipped_adapter"]
