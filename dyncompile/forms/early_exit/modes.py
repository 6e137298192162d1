"""The early-exit form's vocabulary: what an exit decides on and how it reaches the head."""

CONFIDENCE = "confidence"    # the head's prediction: softmax confidence of its top class
CONVERGENCE = "convergence"  # the output itself: cosine to the previous exit's output

FULL = "full"      # exits run the head on the (adapted) stream
POOLED = "pooled"  # exits pool first (the head's pooling region), then adapt and finish
MEAN = "mean"      # the output is the stream itself: decide on its token mean
