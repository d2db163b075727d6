"""The bounds a grammar_string or json_schema must stay within, and the budget of the process that compiles it.

Why these numbers. What each library dies or stalls on (measured on the starter model's 49k-token vocabulary):
llama.cpp's grammar parser recurses per nesting level (100,000 parentheses overflow its stack: SIGSEGV), its
JSON-schema converter writes a string's maxLength out as nested copies (maxLength 100,000: SIGSEGV) and it
refuses more than 2,000 repetitions itself; its sampler checks every live alternative against every token at
each step (12,000 alternatives: 5.7 s per token). xgrammar builds an automaton state per repeated character of a
broad class and checks the vocabulary against each (`[^"]{0,256}` or maxLength 256: about 2.5 s; four distinct
bounds of 64: 3.5 s), and its compile time and memory grow with the properties of one object (1,000 required
properties: 5.9 GB while serialising); a 100,000-value enum or a schema 900 levels deep did not compile within
minutes.

The largest accepted input of each kind compiles in at most 3.5 s with xgrammar and 0.25 s with llama.cpp
(parse and first sampling step) on a 2-core machine under a load of 4-6, all other cases well under a second.
The limits still sit far above what real schemas use: OpenAI's structured outputs allow 10 levels of nesting,
1,000 enum values and 5,000 properties in all, and their published examples use a few dozen properties and no
length bounds at all.
"""
from __future__ import annotations

#: Characters in a grammar_string, or in a json_schema written as compact JSON. Real grammars (llama.cpp's
#: json.gbnf, c.gbnf) are 1-5 KB; a tool set of fifty functions with descriptions stays under 100 KB.
MAX_TEXT_CHARS = 128 * 1024

#: Nesting: containers inside containers of a schema document, or parentheses inside parentheses of a
#: grammar or a regular expression. Every converter and parser recurses once per level.
MAX_NESTING_DEPTH = 64

#: JSON values (objects, arrays, strings, numbers...) in a schema document.
MAX_SCHEMA_NODES = 20_000

#: Properties of one object schema (xgrammar's memory grows faster than linearly in them).
MAX_OBJECT_PROPERTIES = 250

#: Properties of all object schemas together.
MAX_TOTAL_PROPERTIES = 1_000

#: Values of one `enum` (llama.cpp's sampler tries each against the whole vocabulary at each step).
MAX_ENUM_VALUES = 1_000

#: `enum` values and `const`s of the whole schema together.
MAX_TOTAL_ENUM_VALUES = 2_000

#: One count of items, properties or matches: minItems, maxItems, minProperties, maxProperties, minContains,
#: maxContains (llama.cpp's converter writes an array's items out as that many copies; it refuses more than
#: 2,000 repetitions itself).
MAX_ITEMS = 1_000

#: Those counts of one schema added up.
MAX_TOTAL_ITEMS = 10_000

#: Text repetitions of one schema or grammar added up: each distinct string length bound (the larger of
#: minLength and maxLength; strings bounded alike are compiled once) and each `{m,n}` of a pattern or a grammar
#: (the larger of m and n). This is what xgrammar's compile time follows (see above). Nested repetitions
#: multiply, and this keeps their product, as llama.cpp's converter writes a pattern out, within (256 / 2)^2.
MAX_TEXT_REPEAT = 256

#: Characters in one `pattern` (or patternProperties key) of a schema.
MAX_PATTERN_CHARS = 1_000

#: Rules of a grammar.
MAX_GRAMMAR_RULES = 1_000

#: Alternatives (`|`) of a grammar: llama.cpp's sampler follows every live alternative at each step.
MAX_GRAMMAR_ALTERNATIVES = 1_000

#: Seconds the trial compile may take before its process is killed and the constraint refused: the backstop for
#: what the bounds above let through and still costs (a larger vocabulary costs xgrammar proportionally more).
COMPILE_SECONDS = 10.0

#: Seconds a fresh compiler process may take to start and read the model's vocabulary (imports included).
START_SECONDS = 120.0

#: Seconds the compiler process is kept after its last compile (it holds the compiler's libraries and the
#: vocabulary: about 290 MB for xgrammar, which imports torch, and 80 MB for llama.cpp).
IDLE_SECONDS = 600.0

#: Address space the compiler process may add to what it holds after reading the vocabulary (RLIMIT_AS).
MEMORY_BUDGET_BYTES = 3 * 2**30
