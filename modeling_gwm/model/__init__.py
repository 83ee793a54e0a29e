"""The model: GWMConfig, the frozen base, the canvas, training data windows, merges, the loop PEFT method, adapter
files, GWMModel, the parameter budget."""
