fn main() -> std::process::ExitCode {
    saga_streams::cli::main()
}
