# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_dbx_global_optspecs
    string join \n json q/quiet v/verbose C/dir= h/help V/version
end

function __fish_dbx_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_dbx_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_dbx_using_subcommand
    set -l cmd (__fish_dbx_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c dbx -n "__fish_dbx_needs_command" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_needs_command" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_needs_command" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_needs_command" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dbx -n "__fish_dbx_needs_command" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "serve" -d 'Run the server: block store, metadata and journal'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "admin" -d 'Administer a server\'s users (acts on the data directory directly)'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "login" -d 'Log in to a server and store the token'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "logout" -d 'Forget a stored login'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "init" -d 'Make a folder a synced folder'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "push" -d 'Send local changes to the server (new, modified and deleted files)'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "pull" -d 'Bring server changes into the local folder'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "sync" -d 'Sync both ways: local changes up, server changes down; conflicts become conflicted copies'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "status" -d 'Show what `dbx sync` would do, changing nothing'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "watch" -d 'Sync continuously: on local changes and on changes from other devices'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "cat" -d 'Print a file from the server (all of it, or a byte range), streamed'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "history" -d 'Every revision of a file (or, with --all, the recent changes in a folder)'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "restore" -d 'Bring back a revision of a file, or rewind a folder to a moment'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "ls" -d 'List files on the server'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "completions" -d 'Print a shell completion script (e.g. `dbx completions bash > /etc/bash_completion.d/dbx`)'
complete -c dbx -n "__fish_dbx_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dbx -n "__fish_dbx_using_subcommand serve" -l listen -d 'Address to listen on (port 0 picks a free port and prints it)' -r
complete -c dbx -n "__fish_dbx_using_subcommand serve" -l data -d 'Data directory: SQLite `meta.db` and `blocks/`' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand serve" -l retention -d 'Keep every version of every file this many days (`dbx admin gc` frees older ones)' -r
complete -c dbx -n "__fish_dbx_using_subcommand serve" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand serve" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand serve" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand serve" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dbx -n "__fish_dbx_using_subcommand serve" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -l data -d 'The server\'s data directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -f -a "user" -d 'Manage users'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -f -a "gc" -d 'Delete blocks no retained version references (safe while the server runs)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -f -a "fsck" -d 'Check that every block of every retained version exists (and, with --read-data, is intact); changes nothing'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and not __fish_seen_subcommand_from user gc fsck help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -l data -d 'The server\'s data directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -f -a "add" -d 'Create a user (with its own root folder)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -f -a "list" -d 'List users'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -f -a "passwd" -d 'Set a user\'s password'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -f -a "disable" -d 'Disable a user and revoke its tokens'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -f -a "enable" -d 'Enable a disabled user'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from user" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -l retention -d 'Versions are kept this many days (default: the server\'s `--retention`, else 180)' -r
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -l grace -d 'Uploaded blocks not yet committed are kept this many hours' -r
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -l data -d 'The server\'s data directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -s n -l dry-run -d 'Report what would be freed, delete nothing'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from gc" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -l retention -d 'Versions are kept this many days (default: the server\'s `--retention`, else 180)' -r
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -l data -d 'The server\'s data directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -l read-data -d 'Read and hash every block, not only check it exists'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from fsck" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from help" -f -a "user" -d 'Manage users'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from help" -f -a "gc" -d 'Delete blocks no retained version references (safe while the server runs)'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from help" -f -a "fsck" -d 'Check that every block of every retained version exists (and, with --read-data, is intact); changes nothing'
complete -c dbx -n "__fish_dbx_using_subcommand admin; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dbx -n "__fish_dbx_using_subcommand login" -s u -l user -d 'User name' -r
complete -c dbx -n "__fish_dbx_using_subcommand login" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand login" -l password-stdin -d 'Read the password from standard input instead of prompting'
complete -c dbx -n "__fish_dbx_using_subcommand login" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand login" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand login" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand login" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand login" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand logout" -s u -l user -d 'User name (default: the default login\'s)' -r
complete -c dbx -n "__fish_dbx_using_subcommand logout" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand logout" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand logout" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand logout" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand logout" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand logout" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand init" -l remote -d 'The server folder to mirror' -r
complete -c dbx -n "__fish_dbx_using_subcommand init" -l server -d 'Server URL (default: the default login\'s)' -r
complete -c dbx -n "__fish_dbx_using_subcommand init" -s u -l user -d 'User (default: the default login\'s)' -r
complete -c dbx -n "__fish_dbx_using_subcommand init" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand init" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand init" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand init" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand init" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand push" -l max-delete -d 'Stop before deleting more than N files (default: stop before deleting more than 100 files that are also more than half of the folder)' -r
complete -c dbx -n "__fish_dbx_using_subcommand push" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand push" -s n -l dry-run -d 'Show what would change, change nothing'
complete -c dbx -n "__fish_dbx_using_subcommand push" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand push" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand push" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand push" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand push" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand pull" -l max-delete -d 'Stop before deleting more than N files (default: stop before deleting more than 100 files that are also more than half of the folder)' -r
complete -c dbx -n "__fish_dbx_using_subcommand pull" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand pull" -s n -l dry-run -d 'Show what would change, change nothing'
complete -c dbx -n "__fish_dbx_using_subcommand pull" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand pull" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand pull" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand pull" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand pull" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand sync" -l max-delete -d 'Stop before deleting more than N files (default: stop before deleting more than 100 files that are also more than half of the folder)' -r
complete -c dbx -n "__fish_dbx_using_subcommand sync" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand sync" -s n -l dry-run -d 'Show what would change, change nothing'
complete -c dbx -n "__fish_dbx_using_subcommand sync" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand sync" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand sync" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand sync" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand sync" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand status" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand status" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand status" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand status" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand status" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand status" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand watch" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand watch" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand watch" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand watch" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand watch" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand cat" -l range -d 'Only bytes START to END (inclusive, from 0), as `START-END`, `START-` or `-LAST_N`' -r
complete -c dbx -n "__fish_dbx_using_subcommand cat" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand cat" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand cat" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand cat" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand cat" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand cat" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand history" -l limit -d 'Show at most N entries' -r
complete -c dbx -n "__fish_dbx_using_subcommand history" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand history" -l all -d 'Show the journal of the folder (default: the synced folder) instead of one file'
complete -c dbx -n "__fish_dbx_using_subcommand history" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand history" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand history" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand history" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand history" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand restore" -l rev -d 'The revision to bring back (see `dbx history`)' -r
complete -c dbx -n "__fish_dbx_using_subcommand restore" -l at -d 'Rewind everything below PATH to this moment: RFC 3339 (2026-11-26T10:00:00Z) or "2 hours ago"' -r
complete -c dbx -n "__fish_dbx_using_subcommand restore" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand restore" -s n -l dry-run -d 'Print the plan, change nothing'
complete -c dbx -n "__fish_dbx_using_subcommand restore" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand restore" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand restore" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand restore" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand restore" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand ls" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand ls" -s R -l recursive -d 'List everything below, not only direct children'
complete -c dbx -n "__fish_dbx_using_subcommand ls" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand ls" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand ls" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand ls" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand ls" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand completions" -s C -l dir -d 'Act on the synced folder holding DIR instead of the current directory' -r -F
complete -c dbx -n "__fish_dbx_using_subcommand completions" -l json -d 'Print one JSON document on stdout (JSON lines for streams)'
complete -c dbx -n "__fish_dbx_using_subcommand completions" -s q -l quiet -d 'Print only errors'
complete -c dbx -n "__fish_dbx_using_subcommand completions" -s v -l verbose -d 'Print more detail (repeat for debug logs)'
complete -c dbx -n "__fish_dbx_using_subcommand completions" -s h -l help -d 'Print help'
complete -c dbx -n "__fish_dbx_using_subcommand completions" -s V -l version -d 'Print version'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "serve" -d 'Run the server: block store, metadata and journal'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "admin" -d 'Administer a server\'s users (acts on the data directory directly)'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "login" -d 'Log in to a server and store the token'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "logout" -d 'Forget a stored login'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "init" -d 'Make a folder a synced folder'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "push" -d 'Send local changes to the server (new, modified and deleted files)'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "pull" -d 'Bring server changes into the local folder'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "sync" -d 'Sync both ways: local changes up, server changes down; conflicts become conflicted copies'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "status" -d 'Show what `dbx sync` would do, changing nothing'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "watch" -d 'Sync continuously: on local changes and on changes from other devices'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "cat" -d 'Print a file from the server (all of it, or a byte range), streamed'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "history" -d 'Every revision of a file (or, with --all, the recent changes in a folder)'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "restore" -d 'Bring back a revision of a file, or rewind a folder to a moment'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "ls" -d 'List files on the server'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "completions" -d 'Print a shell completion script (e.g. `dbx completions bash > /etc/bash_completion.d/dbx`)'
complete -c dbx -n "__fish_dbx_using_subcommand help; and not __fish_seen_subcommand_from serve admin login logout init push pull sync status watch cat history restore ls completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dbx -n "__fish_dbx_using_subcommand help; and __fish_seen_subcommand_from admin" -f -a "user" -d 'Manage users'
complete -c dbx -n "__fish_dbx_using_subcommand help; and __fish_seen_subcommand_from admin" -f -a "gc" -d 'Delete blocks no retained version references (safe while the server runs)'
complete -c dbx -n "__fish_dbx_using_subcommand help; and __fish_seen_subcommand_from admin" -f -a "fsck" -d 'Check that every block of every retained version exists (and, with --read-data, is intact); changes nothing'
