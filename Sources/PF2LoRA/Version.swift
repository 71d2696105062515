/// The version of pf2lora: `pf2lora --version` prints it and `serve` logs it at start. The one place it is written.
public enum PF2LoRAVersion {
    public static let string = "0.3.0"
}
