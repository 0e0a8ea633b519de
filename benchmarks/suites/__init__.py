"""The benchmark suites, by name, in the order a run executes them."""

from __future__ import annotations

from cases import Suite
from suites import block_diag, butterfly, cayley, conv, layer, model, moe
from suites import lycoris as lycoris_suite

SUITES: dict[str, Suite] = {
    module.SUITE.name: module.SUITE
    for module in (block_diag, cayley, butterfly, layer, conv, model, moe, lycoris_suite)
}
