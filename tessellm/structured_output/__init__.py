"""Structured output: constrain a request's tokens to a JSON schema, regex, choice, EBNF grammar
or structural tag, with xgrammar (docs/structured_output.md).

``params`` is plain data (travels in SamplingParams); ``grammar`` builds and checks xgrammar
grammars; ``compiler`` compiles them off the step loop; ``manager`` fills each step's bitmask
in the engine core; ``apply`` masks the logits in the model runner.
"""

from tessellm.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
