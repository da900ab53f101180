"""Token-map stage: vocabularies -> canonical surface forms -> PM-MinED map (target -> delta)."""

from cmc_edge.tokenmap.explain import explain, map_stats
from cmc_edge.tokenmap.io import cached_token_map, load_token_map, save_token_map
from cmc_edge.tokenmap.pmmined import (ALGORITHM_VERSION, EXACT, IDENTITY, PREFIX_EDIT, SPECIAL_ROLE, UNMAPPED,
                                       TokenMap, build_token_map)
from cmc_edge.tokenmap.vocab import (BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, Vocab, canonical_piece,
                                     read_gguf_vocab, read_tokenizer_json)

__all__ = [
    "ALGORITHM_VERSION", "BYTE", "CONTROL", "EXACT", "IDENTITY", "NORMAL", "PREFIX_EDIT", "SPECIAL_ROLE",
    "UNMAPPED", "UNUSED", "USER_DEFINED", "TokenMap", "Vocab", "build_token_map", "cached_token_map",
    "canonical_piece", "explain", "load_token_map", "map_stats", "read_gguf_vocab", "read_tokenizer_json",
    "save_token_map",
]
