"""Auto-captioning (stage=caption) and the caption review page (stage=review).

client.py talks to an OpenAI-compatible vision server, command.py runs a local
program; post.py turns a raw answer into a training caption; store.py keeps the
generated captions in the run folder, keyed by image content hash; sources.py
picks, per image, the user's caption or the generated one; run.py drives the
stage; page.py writes review.html.
"""
