"""token_merge: the token movements of the ``token`` form.

Bipartite matching of similar tokens (``token_match``), the merge plan it gives for a
budget of merges (``token_assign``), the size-weighted merge of a [rows, tokens, width]
tensor into fewer tokens (``token_merge``) and the row gather that undoes it at the
output (``token_unmerge``).
"""
