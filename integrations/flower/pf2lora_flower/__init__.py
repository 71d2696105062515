"""PF2LoRA on Flower: a ServerApp (FedAvg of the shared LoRA pair) and a ClientApp that drives a
pf2lora client node through its JSON-RPC protocol (train_local / evaluate_local)."""
