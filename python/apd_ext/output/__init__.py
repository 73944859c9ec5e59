"""The output path: token ids -> text, incrementally, and stop strings.

The Engine (its output path, decoding/output.py) owns one RequestText per
request when it is given a tokenizer: each step it feeds the newly accepted ids
and gets back the text delta that is safe to send (complete characters, not a possible start of
a stop string) and whether a stop string ended the request.
"""
