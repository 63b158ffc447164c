"""Project 5: LoRA and QLoRA from scratch (lora.py, nf4.py), adapters interchangeable with peft (peft_io.py)."""
