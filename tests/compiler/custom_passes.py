"""Third-party-style passes used by the plugin tests (not part of lowbit)."""

import onnx_ir as ir


class InsertIdentityPass(ir.passes.InPlacePass):
    """Put an Identity on the first graph input (a visible, harmless change).

    Options:
        label: name of the inserted node.
    """

    def __init__(self, *, label: str = "inserted_by_plugin") -> None:
        self.label = label

    def call(self, model):
        graph = model.graph
        x = graph.inputs[0]
        uses = list(x.uses())
        node = ir.node("Identity", [x], name=self.label)
        graph.insert_before(next(iter(graph)), node)
        for user, idx in uses:
            user.replace_input_with(idx, node.outputs[0])
        return ir.passes.PassResult(model, True)


class BreakGraphPass(ir.passes.InPlacePass):
    """Feed the first node from a tensor nothing produces: an invalid graph."""

    def call(self, model):
        first = next(iter(model.graph))
        first.replace_input_with(0, ir.Value(name="dangling"))
        return ir.passes.PassResult(model, True)


class NotAPass:
    pass
