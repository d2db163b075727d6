"""The chat core shared by the Chat tab and /v1/chat/completions: chat templates (templates), prompt building in
instruct / chat / chat-instruct modes (prompt), characters (characters) and chat histories on disk (history).

Import the submodules directly; this package imports nothing so that reading histories does not load Transformers.
"""
