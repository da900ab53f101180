"""Token-map stage: vocabularies in canonical form -> PM-MinED map (target id -> delta id) -> cache.

``read_gguf_vocab`` / ``read_tokenizer_json`` -> :class:`Vocab`; ``build_token_map(target, delta)`` ->
:class:`TokenMap` (dense ``index`` + ``mask``); ``save_token_map`` / ``load_token_map`` /
``cached_token_map`` for the artifact; ``map_stats`` / ``explain`` for people.
"""

from cmc_edge.tokenmap.explain import explain, map_stats
from cmc_edge.tokenmap.pmmined import (ALGORITHM_VERSION, EXACT, IDENTITY, MATCH_NAMES, PREFIX_EDIT, SPECIAL_ROLE,
                                       UNMAPPED, TokenMap, build_token_map, identity_map)
from cmc_edge.tokenmap.store import FORMAT_VERSION, cached_token_map, load_token_map, save_token_map
from cmc_edge.tokenmap.vocab import (BYTE, CONTROL, KIND_NAMES, NORMAL, UNUSED, USER_DEFINED, Vocab, canonical_piece,
                                     read_gguf_vocab, read_tokenizer_json)

__all__ = [
    "ALGORITHM_VERSION", "BYTE", "CONTROL", "EXACT", "FORMAT_VERSION", "IDENTITY", "KIND_NAMES", "MATCH_NAMES",
    "NORMAL", "PREFIX_EDIT", "SPECIAL_ROLE", "UNMAPPED", "UNUSED", "USER_DEFINED", "TokenMap", "Vocab",
    "build_token_map", "cached_token_map", "canonical_piece", "explain", "identity_map", "load_token_map",
    "map_stats", "read_gguf_vocab", "read_tokenizer_json", "save_token_map",
]
