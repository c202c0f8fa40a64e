"""The pipeline's stages: collect (labels), train (router), evaluate (curves), and the loop that drives them."""
