"""The three roles of the refine loop: policy, GenPRM critic and refiner (see DESIGN §1-3)."""
