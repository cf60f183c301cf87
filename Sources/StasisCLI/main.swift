import ArgumentParser
import Glibc
import Stasis

if PhaseTimer.enabled {
    atexit { FileHandle.standardError.write(line: PhaseTimer.report()) }
}
StasisCommand.main()
